"""The cluster.yaml nodes read inside containers, and what the image promises them.

The user's cluster.yaml says where each node listens on *its machine*. In a container the node
has a network namespace of its own, so it listens on every interface (``0.0.0.0``) and is
reached at a DNS name the orchestrator gives it: the node's own name, which is the compose
service of the node and, in Kubernetes, the node's headless Service (one per node, see
``kmnode.deploy.k8s``). Ports stay those of the user's file, so a node's ports are the same
wherever it runs. The state directory is the volume the image prepares (``STATE_DIR``).

The result is checked by the same validator as any cluster.yaml (``parse_config``), so a file
the nodes would refuse is never written; e.g. two nodes with one port on different machines are
fine in the user's file but collide once both listen on ``0.0.0.0``.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import yaml

from kmnode.config import ClusterConfig, ConfigError, NodeSpec, config_to_yaml, parse_config
from kmnode.deploy.files import DeployError

#: Where the image (docker/Dockerfile) and the manifests put things. Changing one means
#: changing the Dockerfile too (tests/test_deploy.py checks they agree).
CONFIG_DIR = PurePosixPath("/etc/kmsim")
CONFIG_PATH = CONFIG_DIR / "cluster.yaml"
STATE_DIR = PurePosixPath("/var/lib/kmsim")
#: The simulated hardware store inside the state directory (``kmctl hardware``).
HARDWARE_DIR = STATE_DIR / "hardware"
#: The image's non-root user and group.
IMAGE_UID = 10001
LISTEN_ALL = "0.0.0.0"

#: The node's health routes (served unsigned on its API port): ready with a known leader
#: (200, else 503), and alive (200 while the node process and its KM enclave run).
HEALTH_PATH = "/v1/health"
LIVE_PATH = "/v1/health/live"
#: The image's HEALTHCHECK, and compose's: Python's own urllib, so the slim image needs no
#: curl. It asks the node on loopback at ``$KMSIM_API_PORT`` naming ``$KMSIM_API_HOST`` as the
#: request's Host: the node answers only requests for its own names (DNS-rebinding
#: protection), and a node listening on 0.0.0.0 is named by its advertised name, not by
#: 127.0.0.1. An answer other than 200 raises, which exits non-zero. docker/Dockerfile holds
#: this exact text.
API_PORT_VARIABLE = "KMSIM_API_PORT"
API_HOST_VARIABLE = "KMSIM_API_HOST"
HEALTH_PROBE = (
    "import os,urllib.request as u;e=os.environ.get;p=e('KMSIM_API_PORT','7201');"
    "u.urlopen(u.Request('http://127.0.0.1:%s/v1/health'%p,"
    "headers={'Host':'%s:%s'%(e('KMSIM_API_HOST','127.0.0.1'),p)}),timeout=3)"
)


def api_host_header(node: NodeSpec) -> str:
    """The Host a request to ``node``'s API must name: its advertised name and API port."""
    return f"{node.address}:{node.api_port}"


#: A DNS label (RFC 1035) as Kubernetes and DNS want names: what a node's advertised name,
#: Service and StatefulSet must be.
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def node_command(name: str) -> list[str]:
    """The image's arguments (its entry point is kmctl) that run node ``name``. ``-c`` goes
    before the command: it is an option of kmctl itself."""
    return ["-c", str(CONFIG_PATH), "node", "run", name]


def check_dns_names(config: ClusterConfig) -> None:
    """Refuse names that cannot be DNS labels: each node is reached at its own name, and
    Kubernetes names and labels objects after the cluster and its nodes."""
    bad = [f"cluster {config.cluster!r}"] if not _DNS_LABEL.match(config.cluster) else []
    bad += [f"node {n.name!r}" for n in config.nodes if not _DNS_LABEL.match(n.name)]
    if bad:
        raise DeployError(
            f"{', '.join(bad)}: not usable as a DNS name in containers (a name must end "
            "with a letter or digit); rename it in cluster.yaml"
        )


def container_config(config: ClusterConfig, *, mqtt_url: str | None) -> ClusterConfig:
    """``config`` as the nodes read it in containers: every node listens on ``0.0.0.0`` and
    advertises its own name, state lives in ``STATE_DIR``, no network namespaces (the
    container has its own), and the broker is ``mqtt_url`` (None keeps the file's setting).

    Raises :class:`DeployError` if the result would not pass the nodes' own validation.
    """
    check_dns_names(config)
    nodes = [_in_container(node) for node in config.nodes]
    update: dict[str, object] = {"nodes": nodes, "state_dir": Path(str(STATE_DIR))}
    if mqtt_url is not None:
        update["mqtt"] = config.mqtt.model_copy(update={"url": mqtt_url})
    rendered = config.model_copy(update=update)
    try:
        # Through YAML and back, as the nodes will read it: what is checked is what is written.
        return parse_config(yaml.safe_load(config_to_yaml(rendered)), "cluster.yaml for containers")
    except ConfigError as exc:
        problems = "; ".join(exc.problems)
        raise DeployError(
            f"the cluster.yaml for containers would be invalid: {problems} (in containers "
            f"every node listens on {LISTEN_ALL}, so each needs ports of its own)"
        ) from None


def _in_container(node: NodeSpec) -> NodeSpec:
    return node.model_copy(update={"host": LISTEN_ALL, "advertise": node.name, "netns": None})


def container_config_yaml(config: ClusterConfig) -> str:
    """The containers' cluster.yaml, with a header saying where it came from."""
    header = (
        "# Rendered by `kmctl deploy render` for containers: every node listens on 0.0.0.0 and\n"
        "# is reached at its own name; state lives in the node's volume. Edit the source\n"
        "# cluster.yaml and render again rather than this file.\n"
    )
    return header + config_to_yaml(config)
