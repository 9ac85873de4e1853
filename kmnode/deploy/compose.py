"""A docker compose project for one machine: one service per node, a mosquitto broker, volumes.

Compose runs everything on one Docker host, so it keeps `kmctl up`'s model of one machine: the
nodes share one simulated hardware store (the ``hardware`` volume: one vendor root, each
platform's secrets in its own file), and each node keeps its data in a volume of its own. (On
several machines, each node has its own store and imports one vendor root: the Kubernetes
manifests do that.)

Start-up order is only ``service_started``: the first node bootstraps, the others retry their
join for minutes (``kmnode.km.join``), and waiting for the first node to be *healthy* would
deadlock a restart of the whole project (one node alone has no leader, so it is never healthy).

Each node's API port is published on the Docker host's loopback only; peer ports stay on the
project's network. A node answers only requests naming one of its own addresses as the Host
(DNS-rebinding protection): in a container those are its name and 0.0.0.0, so a request to
127.0.0.1:PORT from the Docker host is refused (403 bad_host) until the node also accepts its
loopback names when it listens on 0.0.0.0; the health check names the node itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from kmnode.config import ClusterConfig, NodeSpec
from kmnode.deploy import mosquitto
from kmnode.deploy.containers import (
    API_HOST_VARIABLE,
    API_PORT_VARIABLE,
    CONFIG_PATH,
    HARDWARE_DIR,
    HEALTH_PROBE,
    STATE_DIR,
    container_config,
    container_config_yaml,
    node_command,
)
from kmnode.deploy.files import (
    PRIVATE,
    PRIVATE_DIR,
    PUBLIC,
    DeployError,
    RenderedFile,
    Rendering,
    dump_yaml,
)

BROKER_SERVICE = "mosquitto"
BROKER_IMAGE = "eclipse-mosquitto:2.0.20"
#: Where the broker's files are mounted (read-only), and where it is given its own copies.
BROKER_STAGING = PurePosixPath("/etc/kmsim-mqtt")
BROKER_CONFIG = PurePosixPath("/mosquitto/config")
HARDWARE_VOLUME = "hardware"
#: Where a node finds its broker password. The node reads KMSIM_MQTT_USERNAME and
#: KMSIM_MQTT_PASSWORD_FILE only once its publisher supports credentials (not yet).
PASSWORD_TARGET = "mqtt-password"
COMPOSE_FILE = "compose.yaml"


def broker_url() -> str:
    return f"mqtt://{BROKER_SERVICE}:{mosquitto.MQTT_PORT}"


def render_compose(
    config: ClusterConfig,
    *,
    image: str,
    accounts: Mapping[str, mosquitto.MqttAccount],
) -> Rendering:
    """The compose project of ``config``. ``accounts`` holds a broker account per node and one
    for ``mosquitto.READER`` (unused when cluster.yaml names an external broker)."""
    if any(node.name == BROKER_SERVICE for node in config.nodes):
        raise DeployError(f"a node is named {BROKER_SERVICE!r}, the broker's service: rename it")
    with_broker = config.mqtt.url is None
    inside = container_config(config, mqtt_url=broker_url() if with_broker else None)
    if with_broker:
        users = [n.name for n in config.nodes] + [mosquitto.READER]
        missing = [user for user in users if user not in accounts]
        if missing:
            raise DeployError(f"no broker account for {', '.join(missing)}")
    services: dict[str, Any] = {}
    if with_broker:
        services[BROKER_SERVICE] = _broker_service()
    first = inside.nodes[0].name
    for node in inside.nodes:
        services[node.name] = _node_service(node, image, first=first, with_broker=with_broker)
    project: dict[str, Any] = {
        "name": config.cluster,
        "services": services,
        "volumes": {f"{n.name}-data": {} for n in inside.nodes} | {HARDWARE_VOLUME: {}},
    }
    files = [RenderedFile(PurePosixPath("cluster.yaml"), container_config_yaml(inside))]
    dir_modes: dict[PurePosixPath, int] = {}
    notes = [
        f"build the image first (from the repository root): docker build -f docker/Dockerfile "
        f"-t {image} .",
        f"then: docker compose -f <this directory>/{COMPOSE_FILE} up -d, and see the nodes "
        f"with: docker compose -f <this directory>/{COMPOSE_FILE} exec {first} kmctl status",
    ]
    if with_broker:
        project["secrets"] = {
            _secret_name(n.name): {"file": f"./secrets/{_secret_name(n.name)}.password"}
            for n in inside.nodes
        }
        files += _broker_files(config, accounts)
        dir_modes[PurePosixPath("secrets")] = PRIVATE_DIR
        notes.append(
            "mosquitto refuses anonymous clients; each node has an account (secrets/) but the "
            "node's MQTT publisher does not send credentials yet, so until it does the broker "
            "refuses the nodes and their events are dropped (counted; consensus is unaffected)"
        )
    else:
        notes.append(f"mqtt.url is set: no broker rendered, the nodes publish to {config.mqtt.url}")
    if any(node.netns for node in config.nodes):
        notes.append("netns dropped: each container has a network namespace of its own")
    header = (
        "# Rendered by `kmctl deploy render compose` from cluster.yaml: render again, not edit.\n"
    )
    files.insert(0, RenderedFile(PurePosixPath(COMPOSE_FILE), header + dump_yaml(project)))
    return Rendering(tuple(files), dir_modes, tuple(notes))


def _secret_name(node: str) -> str:
    return f"mqtt-{node}"


def _node_service(node: NodeSpec, image: str, *, first: str, with_broker: bool) -> dict[str, Any]:
    environment = {API_PORT_VARIABLE: str(node.api_port), API_HOST_VARIABLE: node.address}
    service: dict[str, Any] = {
        "image": image,
        "command": node_command(node.name),
        "init": True,  # reaps the enclave processes if one is orphaned; forwards SIGTERM
        "environment": environment,
        "expose": [str(node.peer_port)],
        "ports": [
            {
                "target": node.api_port,
                "published": str(node.api_port),
                "host_ip": "127.0.0.1",
                "protocol": "tcp",
            }
        ],
        "volumes": [
            {"type": "volume", "source": f"{node.name}-data", "target": str(STATE_DIR)},
            {"type": "volume", "source": HARDWARE_VOLUME, "target": str(HARDWARE_DIR)},
            {
                "type": "bind",
                "source": "./cluster.yaml",
                "target": str(CONFIG_PATH),
                "read_only": True,
            },
        ],
        "read_only": True,
        "tmpfs": ["/tmp"],
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "healthcheck": {
            "test": ["CMD", "python", "-c", HEALTH_PROBE],
            "interval": "10s",
            "timeout": "5s",
            "retries": 3,
            "start_period": "60s",
        },
        "restart": "unless-stopped",
        "stop_grace_period": "30s",
    }
    depends: dict[str, Any] = {}
    if with_broker:
        environment |= {
            "KMSIM_MQTT_USERNAME": node.name,
            "KMSIM_MQTT_PASSWORD_FILE": f"/run/secrets/{PASSWORD_TARGET}",
        }
        service["secrets"] = [{"source": _secret_name(node.name), "target": PASSWORD_TARGET}]
        depends[BROKER_SERVICE] = {"condition": "service_started"}
    if node.name != first:
        depends[first] = {"condition": "service_started"}
    if depends:
        service["depends_on"] = depends
    return service


def _broker_service() -> dict[str, Any]:
    # The image's entry point runs the command as root: it copies the password file and ACL
    # (mounted read-only, owned by whoever rendered them) to where only the broker's user reads
    # them, then mosquitto drops to that user before it reads them.
    install = (
        f"install -o mosquitto -g mosquitto -m 0600 {BROKER_STAGING}/passwd "
        f"{BROKER_STAGING}/acl {BROKER_CONFIG}/ "
        f"&& exec mosquitto -c {BROKER_STAGING}/mosquitto.conf"
    )
    return {
        "image": BROKER_IMAGE,
        "command": ["sh", "-c", install],
        "volumes": [
            {
                "type": "bind",
                "source": "./mosquitto",
                "target": str(BROKER_STAGING),
                "read_only": True,
            }
        ],
        "restart": "unless-stopped",
    }


def _broker_files(
    config: ClusterConfig, accounts: Mapping[str, mosquitto.MqttAccount]
) -> list[RenderedFile]:
    names = [n.name for n in config.nodes] + [mosquitto.READER]
    conf = mosquitto.broker_conf(
        password_path=f"{BROKER_CONFIG}/passwd", acl_path=f"{BROKER_CONFIG}/acl"
    )
    files = [
        RenderedFile(PurePosixPath("mosquitto/mosquitto.conf"), conf),
        RenderedFile(PurePosixPath("mosquitto/acl"), mosquitto.acl_file(config)),
        RenderedFile(
            PurePosixPath("mosquitto/passwd"),
            mosquitto.password_file(accounts[name] for name in names),
            PRIVATE,
        ),
    ]
    # Readable by the containers' non-root user through the bind mount; the 0700 directory
    # keeps the host's other users out (see kmnode.deploy.files.PRIVATE_DIR).
    files += [
        RenderedFile(
            PurePosixPath(f"secrets/{_secret_name(name)}.password"),
            accounts[name].password,  # no newline: the file is the password
            PUBLIC,
        )
        for name in names
    ]
    return files
